from distsgd.studies import main

main()
