from drip.entry import main

main()
