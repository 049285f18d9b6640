#!/bin/sh
# Install tfwsgi as a systemd service (run as root from a checkout: `sudo make install`).
#   /opt/tfwsgi/venv            a virtualenv with tfwsgi and its dependencies
#   /opt/tfwsgi/gunicorn_conf.py  the service's working directory holds gunicorn's config
#   /etc/tfwsgi/tfwsgi.env      settings (kept if it exists)
#   /etc/systemd/system/tfwsgi.{service,socket}
#   /var/lib/tfwsgi/models      models; the demo half_plus_two is built there if absent
# DESTDIR stages the same tree elsewhere (no user, no systemctl); PIP_INSTALL_ARGS and
# DEMO_MODEL=no are for staging without TensorFlow.
set -eu
cd "$(dirname "$0")/.."
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
APP=$DESTDIR/opt/tfwsgi
ETC=$DESTDIR/etc/tfwsgi
UNITS=$DESTDIR/etc/systemd/system
MODELS=$DESTDIR/var/lib/tfwsgi/models

if [ -z "$DESTDIR" ] && ! getent passwd tfwsgi >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin tfwsgi
fi
install -d -m 0755 "$APP" "$ETC" "$UNITS" "$MODELS"
[ -x "$APP/venv/bin/python" ] || "$PYTHON" -m venv "$APP/venv"
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS is a list of words
"$APP/venv/bin/python" -m pip install --quiet ${PIP_INSTALL_ARGS:-} .
install -m 0644 gunicorn_conf.py "$APP/gunicorn_conf.py"
install -m 0644 systemd/tfwsgi.service systemd/tfwsgi.socket "$UNITS/"
[ -e "$ETC/tfwsgi.env" ] || install -m 0640 systemd/tfwsgi.env "$ETC/tfwsgi.env"
if [ "${DEMO_MODEL:-yes}" = yes ] && [ ! -e "$MODELS/half_plus_two/1/saved_model.pb" ]; then
  "$APP/venv/bin/python" -m tfwsgi.demo "$MODELS"
fi
if [ -z "$DESTDIR" ]; then
  chgrp tfwsgi "$ETC/tfwsgi.env"
  systemctl daemon-reload
fi
echo "installed; next: systemctl enable --now tfwsgi.socket tfwsgi.service"
