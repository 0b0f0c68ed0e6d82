from step6_backpressure.server import main

main()
