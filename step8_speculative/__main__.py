from step8_speculative.server import main

main()
