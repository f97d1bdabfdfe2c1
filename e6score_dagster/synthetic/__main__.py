from e6score_dagster.synthetic.cli import main

main()
