"""Dashboard assets (templates and static files), shipped as package data; served by server/web.py."""
