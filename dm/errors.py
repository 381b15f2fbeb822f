"""The errors dm raises, each with a message that says what to do.

DMError
├── ConfigError               a setting or URL is wrong
├── RegistryUnavailable       MongoDB or Redis cannot be reached
├── UnknownAlgorithm          no such algorithm (or version) in the repository
├── InvalidArgs               args the algorithm does not allow
├── BadPackage                a package or archive that cannot be used
├── BadRequest                a malformed request or message
├── NoCapacity                a demand no node the fleet can have will ever hold
├── UnknownDeployment         no such deployment id
└── IllegalTransition         a move the lifecycle's table does not allow (dm.lifecycle; a bug)
"""

from __future__ import annotations


class DMError(Exception):
    """Base of every error dm raises on purpose."""

    #: short machine-readable name, used in JSON output and the Kafka DLQ
    code = "error"


class ConfigError(DMError):
    code = "config"


class RegistryUnavailable(DMError):
    code = "registry_unavailable"


class UnknownAlgorithm(DMError):
    code = "unknown_algorithm"


class InvalidArgs(DMError):
    code = "invalid_args"


class BadPackage(DMError):
    code = "bad_package"


class BadRequest(DMError):
    code = "bad_request"


class NoCapacity(DMError):
    code = "no_capacity"


class UnknownDeployment(DMError):
    code = "unknown_deployment"
