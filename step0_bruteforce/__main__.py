from step0_bruteforce.server import main

main()
