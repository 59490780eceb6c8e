"""Per-example gradient features for meta-sample selection (paper Eq. 11-14, Alg. 3), by old path.

The features live in one module per concept: :mod:`pivotal.rbc` (RBC, Eq. 11-12),
:mod:`pivotal.grads` (chunked per-example gradients, layer groups), :mod:`pivotal.gbc`
(GBC, Eq. 13-14) and :mod:`pivotal.history` (snapshot history, Alg. 3). This module re-exports
their public names so that ``from pivotal.features import gbc_features`` keeps working.
"""

from pivotal.gbc import RECOMMENDED_IMPORTANCE_CHUNK_SIZE, GBCInfo, gbc_features, make_gbc_feature_fn
from pivotal.grads import RECOMMENDED_CHUNK_SIZE, layer_groups_of, per_example_grads
from pivotal.history import history_features, sample_snapshot_epochs
from pivotal.rbc import label_free_loss, make_rbc_feature_fn, rbc_features

__all__ = [
    "RECOMMENDED_CHUNK_SIZE",
    "RECOMMENDED_IMPORTANCE_CHUNK_SIZE",
    "GBCInfo",
    "gbc_features",
    "history_features",
    "label_free_loss",
    "layer_groups_of",
    "make_gbc_feature_fn",
    "make_rbc_feature_fn",
    "per_example_grads",
    "rbc_features",
    "sample_snapshot_epochs",
]
