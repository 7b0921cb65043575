#!/bin/sh
# A build step of recipes/hello-service.toml: it runs as root inside the image's root, after
# the packages, users and files, with the recipe's directory readable (and read-only) as the
# working directory.
set -eu
# The service's package and its Debian dependency are installed: ask it for its greeting.
/usr/lib/kiln-hello/answer </dev/null | tail -n 1 > /etc/kiln-hello/baked
# The recipe's files are in place, and its users exist.
test -f /etc/kiln-hello/notes
id deploy >/dev/null
echo "setup.sh: $(cat /etc/kiln-hello/baked)"
