"""The transport room: SMTP listeners, address routing, per-address handlers, sender
verification, the relay and its delivery worker. Sources adapt what they receive into capture
requests (``linking.capture``) and map dispositions back to protocol answers. Imports every room
below it; only the application imports it (docs/architecture.md).
"""
