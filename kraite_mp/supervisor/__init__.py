"""The parent process (`kraite-mp run`) and its contract with the children it forks."""
