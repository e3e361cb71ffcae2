"""stac_optax: STAC (SignSGD Trunk, AdamW Cap) for Optax and Flax."""

from stac_optax.build import partition_modules, resolve_adamw_cap_module_count
from stac_optax.checkpoint import validate_state
from stac_optax.find_stacked import StackedModuleWarning
from stac_optax.guard import NonFiniteGradientError, STACState, nonfinite_skipped_steps
from stac_optax.labels import ADAMW, FROZEN, SIGN
from stac_optax.order_checks import ModuleOrderError, ModuleOrderWarning
from stac_optax.partition import ModuleGroup, STACPartition
from stac_optax.stac import stac
from stac_optax.transforms import (
    SignMomentumState,
    adamw_cap,
    keep_unchanged,
    scale_by_pytorch_amsgrad,
    scale_by_sign_momentum,
    sign_trunk,
    weight_decay_mask,
)

__version__ = "0.1.0"

__all__ = (
    "ADAMW",
    "FROZEN",
    "SIGN",
    "ModuleGroup",
    "ModuleOrderError",
    "ModuleOrderWarning",
    "NonFiniteGradientError",
    "STACPartition",
    "STACState",
    "StackedModuleWarning",
    "SignMomentumState",
    "adamw_cap",
    "keep_unchanged",
    "nonfinite_skipped_steps",
    "partition_modules",
    "resolve_adamw_cap_module_count",
    "scale_by_pytorch_amsgrad",
    "scale_by_sign_momentum",
    "sign_trunk",
    "stac",
    "validate_state",
    "weight_decay_mask",
)
