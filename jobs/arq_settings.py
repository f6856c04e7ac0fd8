"""`arq jobs.arq_settings.WorkerSettings`: the jobs worker under the plain `arq` command.

Settings come from `IOTFLOW_*` variables (and `IOTFLOW_CONFIG`, a TOML file, when set),
read when this module is imported: it is kept apart so nothing else pays for that.
"""

from __future__ import annotations

from jobs.worker import worker_options
from worker.config import load_settings

_options = worker_options(load_settings())


class WorkerSettings:
    functions = _options["functions"]
    cron_jobs = _options["cron_jobs"]
    queue_name = _options["queue_name"]
    redis_settings = _options["redis_settings"]
    on_startup = _options["on_startup"]
    on_shutdown = _options["on_shutdown"]
    ctx = _options["ctx"]
    max_jobs = _options["max_jobs"]
    job_timeout = _options["job_timeout"]
    keep_result = _options["keep_result"]
    max_tries = _options["max_tries"]
    timezone = _options["timezone"]
