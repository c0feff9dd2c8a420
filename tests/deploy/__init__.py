"""What deploy/ ships, checked for real: images' installs, manifests, nginx, Prometheus, systemd."""
