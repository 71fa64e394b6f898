"""Watching guest memory traffic: the TCG plugin shim (C), its shared layout, and the tracer.

``shim`` builds the plugin for the installed QEMU; ``layout`` mirrors its shared-memory layout;
``tracer`` reads its counters and rings; ``accesses`` and ``foreign`` turn records into accesses,
per-page traffic and foreign-KeyID reads. Nothing here knows about keys: KeyIDs arrive as numbers.
"""
