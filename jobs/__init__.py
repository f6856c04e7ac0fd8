"""arq jobs: rollups, device-health reports, retention and the offline sweep (docs/jobs.md).

`iotflow jobs` starts a worker (jobs.worker); jobs.tasks holds the job functions.
"""
