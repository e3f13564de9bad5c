"""Infobip delivery reports (issue 11): pulled (pull), pushed (webhook), applied (sink), and the
DSNs they cause (bounces)."""
