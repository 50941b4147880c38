"""The model core: reference encoder, projections, decoupled cross-attention, adapter install/save/load."""

from dreampainter.models.adapter import (
    AdapterConfig,
    adapter_parameter_names,
    adapter_parameters,
    adapter_state_dict,
    build_projection,
    cast_frozen_unet,
    cross_attention_layers,
    drop_references,
    get_adapter_config,
    has_reference_adapter,
    install_reference_adapter,
    reference_features,
    reference_processors,
    remove_reference_adapter,
    set_reference_scale,
    without_reference_adapter,
)
from dreampainter.models.adapter_io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    export_ip_adapter,
    import_ip_adapter,
    ip_adapter_state_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from dreampainter.models.attention import DecoupledCrossAttnProcessor
from dreampainter.models.projection import LinearProjection, ReferenceProjection, Resampler
from dreampainter.models.reference_encoder import (
    ReferenceEncoder,
    ReferenceEncoderOutput,
    prepare_reference,
)
from dreampainter.models.tiny import build_tiny_reference_encoder

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterConfig",
    "DecoupledCrossAttnProcessor",
    "LinearProjection",
    "ReferenceEncoder",
    "ReferenceEncoderOutput",
    "ReferenceProjection",
    "Resampler",
    "adapter_parameter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "build_projection",
    "build_tiny_reference_encoder",
    "cast_frozen_unet",
    "cross_attention_layers",
    "drop_references",
    "export_ip_adapter",
    "get_adapter_config",
    "has_reference_adapter",
    "import_ip_adapter",
    "install_reference_adapter",
    "ip_adapter_state_dict",
    "load_adapter",
    "prepare_reference",
    "read_adapter_config",
    "reference_features",
    "reference_processors",
    "remove_reference_adapter",
    "save_adapter",
    "set_reference_scale",
    "without_reference_adapter",
]
