"""pivotal: select pivotal meta samples for meta re-weighting, in pure JAX.

Public API (names and meanings are a contract, see DESIGN.md):

* meta re-weighting: :func:`weight_gradient`, :func:`direct_weights`, :func:`l2rw`,
  :func:`meta_weight_net`, :func:`make_meta_step`;
* features for selection: :func:`rbc_features`, :func:`gbc_features`,
  :func:`per_example_grads`, :func:`label_free_loss`;
* clustering and selection: :func:`weighted_spherical_kmeans`, :func:`select_meta_samples`
  and the baseline selectors.

Modules, bottom to top (each imports only those below it): ``_checks`` (argument checks),
``_placement`` (where the example axis lives), ``_rows`` (the row-block engine); ``reweight``,
``trainer``; ``rbc``, ``grads``, ``gbc``, ``history``; ``lloyd``, ``kmeans``; ``selection``,
``baselines``, ``diagnostics``, ``outofcore``; ``sharding`` and the ``features`` facade.
"""

from pivotal import features, outofcore, sharding
from pivotal.baselines import (
    certainty_selection,
    craig_selection,
    predictive_entropy,
    random_selection,
    uncertainty_selection,
)
from pivotal.diagnostics import mco_objective, msso_objective, stable_examples, theorem1_ratio
from pivotal.gbc import gbc_features
from pivotal.grads import per_example_grads
from pivotal.history import history_features, sample_snapshot_epochs
from pivotal.kmeans import KMeansResult, assign_clusters, weighted_spherical_kmeans
from pivotal.rbc import label_free_loss, rbc_features, sketch_rbc_features
from pivotal.reweight import (
    DirectWeightsState,
    MetaWeightNetState,
    Reweighter,
    RuleOutput,
    direct_weights,
    l2rw,
    lookahead,
    meta_objective,
    meta_weight_net,
    weight_gradient,
    weight_net_apply,
)
from pivotal.selection import select_meta_samples
from pivotal.sharding import data_mesh, replicate, shard_examples
from pivotal.trainer import (
    META_GRADIENTS,
    MetaTrainer,
    MetaTrainState,
    check_finite,
    example_weights,
    make_meta_step,
)

__version__ = "0.1.0"

__all__ = [
    "META_GRADIENTS",
    "DirectWeightsState",
    "KMeansResult",
    "MetaTrainState",
    "MetaTrainer",
    "MetaWeightNetState",
    "Reweighter",
    "RuleOutput",
    "assign_clusters",
    "certainty_selection",
    "check_finite",
    "craig_selection",
    "data_mesh",
    "direct_weights",
    "example_weights",
    "gbc_features",
    "history_features",
    "l2rw",
    "label_free_loss",
    "lookahead",
    "make_meta_step",
    "mco_objective",
    "meta_objective",
    "meta_weight_net",
    "msso_objective",
    "outofcore",
    "per_example_grads",
    "predictive_entropy",
    "random_selection",
    "rbc_features",
    "replicate",
    "sample_snapshot_epochs",
    "select_meta_samples",
    "shard_examples",
    "sharding",
    "sketch_rbc_features",
    "stable_examples",
    "theorem1_ratio",
    "uncertainty_selection",
    "weight_gradient",
    "weight_net_apply",
    "weighted_spherical_kmeans",
]
