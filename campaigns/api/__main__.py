"""``python -m campaigns.api [--host H] [--port P] [--processes N]``: serve the HTTP service."""

import argparse

from campaigns.api.serve import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m campaigns.api", description=__doc__)
    parser.add_argument("--host", help="address to bind (API_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (API_PORT; default 8090)")
    parser.add_argument("--processes", type=int, help="processes sharing the port (API_PROCESSES)")
    args = parser.parse_args()
    main(args.host, args.port, args.processes)
