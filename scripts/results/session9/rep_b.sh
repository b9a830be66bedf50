export ORDER="fp8-channel none"
. scripts/results/session9/rep.sh
