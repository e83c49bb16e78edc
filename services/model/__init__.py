"""The scripted model: an OpenAI-compatible server that plays scenario scripts offline.

``core`` decides replies and builds OpenAI shapes (pure); ``main`` is the aiohttp
server and :func:`services.model.main.serve_in_background` for in-process use in
tests; ``python -m services.model`` runs it as a service.
"""
