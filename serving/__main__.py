import sys

from packing.errors import MyriadError
from serving.http.server import main

try:
    main()
except MyriadError as exc:  # a user's mistake: one line, no traceback
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
