"""Everything specific to Infobip, in one place.

- `regions`: the SMTP API endpoints per region and the ports each offers;
- `priority`: X-IB-Client-Priority values and the order they are sent in;
- `replies`: parsing what the endpoint answers (the message id in the DATA reply);
- `headers`: the X-IB-* header schema and value checks, which the rules compiler and the
  listeners' `client_headers` policy both apply.
"""
