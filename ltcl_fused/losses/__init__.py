from .afcl import acl, afcl, fcl  # noqa: F401
from .bcl import bcl  # noqa: F401
from .supcon import supcon  # noqa: F401
