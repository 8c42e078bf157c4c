"""Per-address business logic of the inbound listener: one module per kind of address
(``mta.routing.KINDS``): Smart BCC and ``+deal``, ``+choice-`` answers, ``+ask`` requests.
"""
