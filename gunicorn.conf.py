"""gunicorn settings for the model server: every knob comes from a SERVING_* environment variable.

gunicorn reads this file by default from the working directory, so `gunicorn flask_server:app -w 4`
uses it too; command-line flags (-w, -b, --threads, ...) override it. The settings and the hooks
(models load after fork in post_worker_init, metrics wiped on_starting, dead workers marked in
child_exit) live in serving/host/conf.py, commented, so that `serving serve` from an installed
package runs exactly the same configuration. See docs/settings.md or `serving config`.
"""

from serving.host.conf import *  # noqa: F403
