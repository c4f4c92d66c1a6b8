"""slimoptax: lean, structure-aware optimizers for Optax.

Each algorithm family lives in its own module and is exported here as its
alias, its ``scale_by_*`` transformation and its state. The label-rule
machinery (`slimoptax.rules`, `slimoptax.presets`, `slimoptax.layers`) is what
every transform reads per-parameter axes through.
"""

# Label rules: path -> label -> axes, axis roles, presets.
from slimoptax import layers
from slimoptax import layouts
from slimoptax import presets
from slimoptax import rules
from slimoptax import rules_io
from slimoptax import trace
from slimoptax.layers import LAYER_TYPES
from slimoptax.layers import Reshaped
from slimoptax.layers import Split
from slimoptax.layers import axis_roles
from slimoptax.layouts import Fused
from slimoptax.layouts import Layout
from slimoptax.layouts import layout_roles
from slimoptax.presets import PRESETS
from slimoptax.presets import layer_type
from slimoptax.presets import preset
from slimoptax.presets import weight_decay_mask
from slimoptax.rules import GenericLayerWarning
from slimoptax.rules import Rule
from slimoptax.rules import Rules
from slimoptax.rules import compression_axes
from slimoptax.rules import param_labels
from slimoptax.trace import TracedRoles
from slimoptax.trace import compare_with_names
from slimoptax.trace import trace_roles

# SlimAdam (AdaLayer, Adam-mini and Adam through other axes).
from slimoptax._slim_adam import ScaleBySlimAdamState
from slimoptax._slim_adam import default_weight_decay_mask
from slimoptax._slim_adam import scale_by_slim_adam
from slimoptax._slim_adam import slim_adamw

# Sign methods: SignSGD, Signum, EMASign, mollified Signum.
from slimoptax._sign import ScaleBySignState
from slimoptax._sign import scale_by_sign

# AdaVar: Adam as a mean/variance estimator.
from slimoptax._adavar import ScaleByAdaVarState
from slimoptax._adavar import mean_variance_from_adam
from slimoptax._adavar import scale_by_adavar

# Adafactor: factored second moments.
from slimoptax._adafactor import ScaleByAdafactorState
from slimoptax._adafactor import factored_rules
from slimoptax._adafactor import resolve_factored_axes
from slimoptax._adafactor import scale_by_adafactor
from slimoptax._adafactor import scale_by_factored_second_moment

# Muon: Newton–Schulz orthogonalization.
from slimoptax._newton_schulz import CUBIC_COEFFS
from slimoptax._newton_schulz import QUINTIC_COEFFS
from slimoptax._newton_schulz import muon_flop_overhead
from slimoptax._newton_schulz import newton_schulz
from slimoptax._newton_schulz import newton_schulz_flops
from slimoptax._muon import MuonDimensionNumbers
from slimoptax._muon import ReshapedDims
from slimoptax._muon import ScaleByMuonState
from slimoptax._muon import matrix_dims
from slimoptax._muon import muon
from slimoptax._muon import muon_labels
from slimoptax._muon import orthogonalize
from slimoptax._muon import scale_by_matrix_shape
from slimoptax._muon import scale_by_muon
from slimoptax._muon import scale_by_muon_momentum

# Column max descent: steepest descent under a per-column l1 budget.
from slimoptax._column_max import ScaleByColumnMaxState
from slimoptax._column_max import column_max_descent
from slimoptax._column_max import column_max_direction
from slimoptax._column_max import column_max_labels
from slimoptax._column_max import scale_by_column_max

# Sophia: diagonal curvature (Hutchinson, Gauss–Newton–Bartlett).
from slimoptax._sophia import ScaleByHutchinsonState
from slimoptax._sophia import gnb_estimate
from slimoptax._sophia import hutchinson_estimate
from slimoptax._sophia import scale_by_hutchinson
from slimoptax._sophia import sophia
from slimoptax._sophia import sophia_win_rate

# SNR analysis of second moments and the rules it derives.
from slimoptax._snr import SNRTracker
from slimoptax._snr import depth_average
from slimoptax._snr import depth_group
from slimoptax._snr import derive_rules
from slimoptax._snr import find_second_moment
from slimoptax._snr import load_snr_csv
from slimoptax._snr import second_moments_kept
from slimoptax._snr import snr
from slimoptax._snr import time_average

# Quantized optimizer states: blockwise 8-bit / 4-bit, bf16 with stochastic rounding.
from slimoptax._codecs import QuantizedArray
from slimoptax._quantize import QuantizedState
from slimoptax._codecs import codebook
from slimoptax._codecs import dequantize
from slimoptax._codecs import dynamic_map
from slimoptax._codecs import quantize
from slimoptax._quantize import quantize_state
from slimoptax._codecs import stochastic_round_bf16

# Diagnostics: state memory, per-layer norms.
from slimoptax.diagnostics import layer_norms
from slimoptax.memory import MemoryReport
from slimoptax.memory import abstract_state
from slimoptax.memory import memory_report
from slimoptax.memory import tree_bytes

# Sharding and checkpoints.
from slimoptax import checkpoint
from slimoptax import sharding
from slimoptax.checkpoint import CheckpointIntegrityError
from slimoptax.checkpoint import StateMismatchError
from slimoptax.checkpoint import restore_state
from slimoptax.checkpoint import save_state
from slimoptax.sharding import abstract_sharded_state
from slimoptax.sharding import init_sharded
from slimoptax.sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
    "CUBIC_COEFFS",
    "CheckpointIntegrityError",
    "LAYER_TYPES",
    "MemoryReport",
    "MuonDimensionNumbers",
    "PRESETS",
    "QUINTIC_COEFFS",
    "QuantizedArray",
    "QuantizedState",
    "Reshaped",
    "Split",
    "Fused",
    "Layout",
    "layout_roles",
    "ReshapedDims",
    "GenericLayerWarning",
    "Rule",
    "Rules",
    "SNRTracker",
    "ScaleByAdaVarState",
    "ScaleByAdafactorState",
    "ScaleByColumnMaxState",
    "ScaleByHutchinsonState",
    "ScaleByMuonState",
    "ScaleBySignState",
    "ScaleBySlimAdamState",
    "StateMismatchError",
    "TracedRoles",
    "abstract_sharded_state",
    "abstract_state",
    "axis_roles",
    "checkpoint",
    "codebook",
    "column_max_descent",
    "column_max_direction",
    "column_max_labels",
    "compare_with_names",
    "compression_axes",
    "default_weight_decay_mask",
    "depth_average",
    "depth_group",
    "dequantize",
    "derive_rules",
    "dynamic_map",
    "factored_rules",
    "find_second_moment",
    "gnb_estimate",
    "hutchinson_estimate",
    "init_sharded",
    "layer_norms",
    "layer_type",
    "layers",
    "load_snr_csv",
    "matrix_dims",
    "mean_variance_from_adam",
    "memory_report",
    "muon",
    "muon_flop_overhead",
    "muon_labels",
    "newton_schulz",
    "newton_schulz_flops",
    "orthogonalize",
    "param_labels",
    "preset",
    "presets",
    "quantize",
    "quantize_state",
    "resolve_factored_axes",
    "restore_state",
    "rules",
    "rules_io",
    "scale_by_adafactor",
    "scale_by_adavar",
    "scale_by_column_max",
    "scale_by_factored_second_moment",
    "scale_by_hutchinson",
    "scale_by_matrix_shape",
    "scale_by_muon",
    "scale_by_muon_momentum",
    "scale_by_sign",
    "save_state",
    "scale_by_slim_adam",
    "second_moments_kept",
    "sharding",
    "slim_adamw",
    "snr",
    "sophia",
    "sophia_win_rate",
    "state_shardings",
    "stochastic_round_bf16",
    "time_average",
    "trace",
    "trace_roles",
    "tree_bytes",
    "weight_decay_mask",
)

# Shampoo and SOAP: Kronecker-factored preconditioners (slimoptax._kronecker).
from slimoptax._shampoo import ScaleByShampooState  # noqa: E402
from slimoptax._shampoo import scale_by_shampoo  # noqa: E402
from slimoptax._shampoo import shampoo  # noqa: E402
from slimoptax._soap import PreconditionInEigenbasisState  # noqa: E402
from slimoptax._soap import precondition_in_eigenbasis  # noqa: E402
from slimoptax._soap import scale_by_soap  # noqa: E402
from slimoptax._soap import scale_by_soap_adam  # noqa: E402
from slimoptax._soap import soap  # noqa: E402

__all__ = (*__all__, "PreconditionInEigenbasisState", "ScaleByShampooState",
           "precondition_in_eigenbasis", "scale_by_shampoo", "scale_by_soap", "scale_by_soap_adam",
           "shampoo", "soap")
