from alldetect.models.factory import REPORT_ARCHS, count_parameters, create_model, default_input_size, model_from_config

__all__ = ["REPORT_ARCHS", "count_parameters", "create_model", "default_input_size", "model_from_config"]
