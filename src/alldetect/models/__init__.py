from alldetect.models.factory import count_parameters, create_model, model_from_config
from alldetect.models.names import REPORT_ARCHS, default_input_size

__all__ = ["REPORT_ARCHS", "count_parameters", "create_model", "default_input_size", "model_from_config"]
