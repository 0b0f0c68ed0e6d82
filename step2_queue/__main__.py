from step2_queue.server import main

main()
