export ORDER="none fp8-channel"
. scripts/results/session9/rep.sh
