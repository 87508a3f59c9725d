"""Domain packages. Each sub-package registers itself on import (see ``loupe.core.domain.register_domain``)."""
