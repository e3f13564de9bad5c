"""infobip-relay: an SMTP smarthost that forwards legacy mail to Infobip's SMTP API."""

__version__ = "0.1.0"
