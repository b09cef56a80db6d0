#!/usr/bin/env python3
"""Time openmined-psi (C++ core, P-256 ECDH) on the same id sets as `baygrid bench psi`.

Usage: psi-anchor.py N  -- guest ids 0..N, host ids N/2..N/2+N, as decimal strings.
Messages are serialised and parsed as they would be on the wire; both roles
run in this one process. Prints one JSON line with the seconds and sizes.
"""
import json
import sys
import time

try:
    import private_set_intersection.python as psi
except ImportError:
    sys.exit("openmined-psi is not installed: pip install openmined-psi")

n = int(sys.argv[1])
guest = [str(i) for i in range(n)]
host = [str(i) for i in range(n // 2, n // 2 + n)]

start = time.perf_counter()
client = psi.client.CreateWithNewKey(True)
server = psi.server.CreateWithNewKey(True)
setup = server.CreateSetupMessage(0.0, len(guest), host, psi.DataStructure.RAW)
setup_wire = setup.SerializeToString()
request_wire = client.CreateRequest(guest).SerializeToString()
request = psi.Request()
request.ParseFromString(request_wire)
response_wire = server.ProcessRequest(request).SerializeToString()
response = psi.Response()
response.ParseFromString(response_wire)
setup_msg = psi.ServerSetup()
setup_msg.ParseFromString(setup_wire)
found = client.GetIntersection(setup_msg, response)
seconds = time.perf_counter() - start
assert len(found) == n - n // 2, (len(found), n - n // 2)
print(json.dumps({
    "anchor": "openmined-psi",
    "ids_per_party": n,
    "intersection": len(found),
    "seconds": round(seconds, 3),
    "bytes": len(setup_wire) + len(request_wire) + len(response_wire),
}))
