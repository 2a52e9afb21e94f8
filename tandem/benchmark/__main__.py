import sys

from tandem.benchmark import main

sys.exit(main(sys.argv[1:]))
