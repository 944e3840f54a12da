"""One configuration per stage: frozen dataclass trees (`distill.config`, `pipelines.config.distill`,
`pipelines.config.extract`), the YAML files that set them (`pipelines/configs/`), and the click options made from
them (`pipelines.config.cli`)."""
from pipelines.config.tree import ConfigError

__all__ = ["ConfigError"]
