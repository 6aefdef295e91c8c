"""The one database schema of the service, shared by the API and the workers.

The worker imports this package (models, sessions, metric writes) but never ``server.api``.
"""

from server.db.models import ApiKey, Base, FisherValue, Job, MetricPoint, Run
from server.db.session import get_engine, session_factory, session_scope

__all__ = [
    "ApiKey",
    "Base",
    "FisherValue",
    "Job",
    "MetricPoint",
    "Run",
    "get_engine",
    "session_factory",
    "session_scope",
]
