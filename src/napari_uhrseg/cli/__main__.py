import sys

from napari_uhrseg.cli import main

sys.exit(main())
