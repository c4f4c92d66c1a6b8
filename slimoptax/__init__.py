"""slimoptax: lean, structure-aware Adam-family optimizers for Optax."""

from slimoptax import labels
from slimoptax.labels import (
    LAYER_TYPES,
    PRESETS,
    Reshaped,
    Rule,
    Rules,
    axis_roles,
    compression_axes,
    layer_type,
    param_labels,
    preset,
)
from slimoptax.slim_adam import (
    ScaleBySlimAdamState,
    scale_by_slim_adam,
    slim_adamw,
)

# --- snr / diagnostics (foundation) ---
from slimoptax.diagnostics import (
    MemoryReport,
    abstract_state,
    layer_norms,
    memory_report,
    tree_bytes,
)
from slimoptax.analysis import (
    SNRTracker,
    depth_average,
    depth_group,
    derive_rules,
    find_second_moment,
    load_snr_csv,
    second_moments_kept,
    snr,
    time_average,
)
# --- sign, factored, variance families (issue 3) ---
from slimoptax import ladder
from slimoptax.factored import (
    ScaleByAdafactorState,
    factored_rules,
    resolve_factored_axes,
    scale_by_adafactor,
)
from slimoptax.ladder import LADDER
from slimoptax.sign import ScaleBySignState, scale_by_sign
from slimoptax.variance import (
    ScaleByAdaVarState,
    mean_variance_from_adam,
    scale_by_adavar,
)
# --- orthogonalize, curvature (issue 4) ---
from slimoptax.orthogonalize import (
    CUBIC_COEFFS,
    QUINTIC_COEFFS,
    MuonDimensionNumbers,
    ReshapedDims,
    ScaleByMuonState,
    matrix_dims,
    muon,
    muon_flop_overhead,
    muon_labels,
    newton_schulz,
    newton_schulz_flops,
    orthogonalize,
    scale_by_matrix_shape,
    scale_by_muon,
)
from slimoptax.curvature import (
    ScaleByHutchinsonState,
    gnb_estimate,
    hutchinson_estimate,
    scale_by_hutchinson,
    sophia,
    sophia_win_rate,
)

__version__ = "0.1.0"
# --- sharding, checkpoints (issue 5) ---
from slimoptax import checkpoint, sharding
from slimoptax.checkpoint import StateMismatchError, restore_state
from slimoptax.sharding import abstract_sharded_state, init_sharded, state_shardings
