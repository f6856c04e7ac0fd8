"""Alert rules: evaluation on the stream, alert lifecycles, notifications (docs/rules.md).

model        rule definitions and their validation
ruleset      the rules in force, indexed by (device, measurement)
evaluator    readings → alert events; pure, with an injectable clock
events       alert events and the documents/notifications derived from them
messages     human-readable alert messages
source       loading rules from `device_configs`, change detection
state        what the evaluator resumes from after a start
actor        the rules actor between decoder and writer
admin        rules CRUD for the CLI; alert_admin: listing and acknowledging alerts

`iotflow rules …` and `iotflow alerts …` are in worker/cli; the rules' benchmark in
worker/tools/bench/rules.py.
"""
