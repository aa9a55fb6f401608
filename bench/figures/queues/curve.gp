set terminal pngcairo size 900,500 noenhanced
set output "curve.png" # run from bench/figures/queues
set title "4 KiB random reads, 4 fio jobs x depth 32, 4 vCPUs (TCG, 6.12)"
set xlabel "ublkimg --queues"
set ylabel "IOPS"
set xtics ("1" 1, "2" 2, "4" 4)
set xrange [0.8:4.2]
set yrange [0:*]
set key outside right top
set grid
plot "curve.dat" using 1:2 with linespoints lw 2 pt 7 title "ublkimg, run 2 (load 3.7)", \
     "curve.dat" using 1:3 with lines dt 2 lw 2 title "loop, run 2", \
     "curve.dat" using 1:4 with linespoints lw 2 pt 5 title "ublkimg, run 1 (load 6.4)", \
     "curve.dat" using 1:5 with lines dt 3 lw 2 title "loop, run 1"
