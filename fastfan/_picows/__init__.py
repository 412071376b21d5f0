from .common import (
    WSError,
    WSHandshakeError,
    WSInvalidMessageError,
    WSInvalidStatusError,
    WSInvalidHeaderError,
    WSInvalidUpgradeError,
    WSProtocolError,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    PICOWS_DEBUG_LL
)

from .url import (
    WSInvalidURL,
    WSParsedURL
)

from .picows import (
    WSMsgType,
    WSCloseCode,
    WSAutoPingStrategy,
    WSFrame,
    WSTransport,
    WSListener,
)

from .api import (
    ws_connect,
    ws_create_server,
)

__all__ = [
    'WSError',
    'WSHandshakeError',
    'WSInvalidMessageError',
    'WSInvalidStatusError',
    'WSInvalidHeaderError',
    'WSInvalidUpgradeError',
    'WSProtocolError',
    'WSUpgradeRequest',
    'WSUpgradeResponse',
    'WSUpgradeResponseWithListener',
    'PICOWS_DEBUG_LL',
    'WSInvalidURL',
    'WSParsedURL',
    'WSMsgType',
    'WSCloseCode',
    'WSAutoPingStrategy',
    'WSFrame',
    'WSTransport',
    'WSListener',
    'ws_connect',
    'ws_create_server',
]

from .version import __author__, __version__
