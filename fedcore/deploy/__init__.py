"""Deployment: the server party and each client party as separate processes over gRPC with mutual TLS.

* :mod:`~fedcore.deploy.provision`: the federation CA, certificates, kits and revocation list;
* :mod:`~fedcore.deploy.transport`: the gRPC channel (server side) and endpoint (client side);
* :mod:`~fedcore.deploy.processes`: ``fedcore server`` and ``fedcore client``;
* :mod:`~fedcore.deploy.launch`: ``fedcore launch``, a whole federation on the loopback interface.
"""

from .provision import CertificateRefused, ClientKit, ServerKit, provision, revoke
from .transport import ClientEndpoint, GrpcChannel, Limits, Refused

__all__ = [
    "provision",
    "revoke",
    "ServerKit",
    "ClientKit",
    "CertificateRefused",
    "GrpcChannel",
    "ClientEndpoint",
    "Limits",
    "Refused",
]
