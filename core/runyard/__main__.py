from runyard.console import main

main()
