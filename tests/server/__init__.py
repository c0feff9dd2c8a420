"""Real servers: gunicorn on a free loopback port, driven over real HTTP (marked slow)."""
