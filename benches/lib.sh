# Shell helpers the benchmark programs share; sourced, not run.

# Puts an mmdebstrap on "$1/bin" (first on PATH when a bench puts it there) that keeps the
# arguments of kiln's staging, not of its --simulate, in "$1/staging-args".
wrap_mmdebstrap() {
  mkdir -p "$1/bin"
  cat > "$1/bin/mmdebstrap" <<EOF
#!/bin/sh
case " \$* " in *" --simulate "*) ;; *) printf '%s\n' "\$@" > "$1/staging-args" ;; esac
exec /usr/bin/mmdebstrap "\$@"
EOF
  chmod +x "$1/bin/mmdebstrap"
}

# The median of the numbers on standard input, one a line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
