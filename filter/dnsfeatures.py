"""dnspython without DNS-over-HTTPS: imported before anything imports ``dns.query``.

checkdmarc requires ``dnspython[doh]``, which installs an HTTP client (httpx2, h2);
with one installed, dnspython imports it in ``dns.query``, about 70 ms at every start
of ``mailgate serve`` and of each CLI command, for a transport mailgate never uses (it
asks ``dns.nameservers`` over UDP and TCP). ``dns._features.force`` is dnspython's own
switch, "provided as a workaround ... or for testing"; should a later dnspython drop
it, only the start-up time is lost.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError, AttributeError):
    import dns._features

    dns._features.force("doh", False)
