"""The study's report: what the runs found (`findings`), how architectures and recipes compare (`comparison`),
inference speed (`speed`), assembled into a page (`build`)."""
