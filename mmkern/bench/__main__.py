import sys

from mmkern.bench.command import main

sys.exit(main())
