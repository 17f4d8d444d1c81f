"""What a module *is*, in one place (roles, families, attention, parametrised weights, blocks).

Every layer reads this package: the collector (which modules to hook, whose input to record,
which outputs saturate, which modules the probes measure), the checks and the report. It is
split by the question asked of a module:

- :mod:`.kinds`: its role (activation / norm / dropout), activation family, type-name sets for
  runs read back without the model, channel layout and feature size;
- :mod:`.attention`: attention modules (q/k projections, heads, scale) and transformer blocks;
- :mod:`.parametrized`: parametrised layers (weight normalisation) and their tensors' names;
- :mod:`.blocks`: repeated blocks and where each one normalises (pre-LN / post-LN).

Everything public is re-exported here: ``from normscope.roles import role`` and friends.
Importing it costs only torch (already imported by anything that has a model).
"""

from normscope.roles.attention import (  # noqa: F401
    QK_CHILDREN,
    QK_NORM_CHILDREN,
    AttentionSpec,
    attention_modules,
    attention_spec,
    transformer_blocks,
)
from normscope.roles.blocks import (  # noqa: F401
    block_of,
    block_stacks,
    norm_placement,
    numbered_prefixes,
)
from normscope.roles.kinds import (  # noqa: F401
    ALPHA_DROPOUT,
    BATCHNORM,
    BOUNDED,
    DROPOUT,
    EMBEDDING,
    INSTANCENORM,
    LINEAR_LIKE,
    LRN,
    NORM_TYPES,
    PARAMETRIZATION_ORIGINS,
    RELU,
    RELU_TYPES,
    ROLES,
    SEQUENCE,
    SIGMOID,
    TANH,
    channels_first_norm,
    check_roles,
    family,
    family_of,
    feature_size,
    is_bn,
    is_norm,
    is_norm_info,
    module_class,
    own_parameters,
    relu_layers,
    role,
    type_name,
)
from normscope.roles.parametrized import (  # noqa: F401
    is_parametrization_path,
    parametrized_param_leaf,
    weight_norm,
)
