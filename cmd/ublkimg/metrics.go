package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"ublkimg/ublk"
)

func init() { registerCommands(metricsCommand) }

func metricsCommand() *cli.Command {
	return &cli.Command{
		Name:  "metrics",
		Usage: "serve the figures of every device of the host to Prometheus",
		Description: "Serves http://ADDR/metrics in Prometheus' text format until SIGTERM or SIGINT: on\n" +
			"every scrape it asks the server of every device ublkimg serves for its figures\n" +
			"(as ublkimg stats does). Metrics, labelled device, image, queue and op:\n" +
			"ublkimg_requests_total, ublkimg_request_bytes_total, ublkimg_request_errors_total,\n" +
			"ublkimg_request_duration_seconds (histogram), ublkimg_requests_in_flight; per\n" +
			"device ublkimg_device_up (1 when its server answered), ublkimg_server_uptime_seconds\n" +
			"and the format's counters (ublkimg_qcow2_l2_cache_hits_total, ...).\n" +
			"systemd/ublkimg-metrics.service runs it at boot.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Required: true, Usage: "`ADDR` to serve on, host:port (e.g. 127.0.0.1:9740)"},
		},
		Action: metricsAction,
	}
}

func metricsAction(c *cli.Context) error {
	if c.NArg() != 0 {
		return errors.New("metrics: no arguments expected (ublkimg metrics --listen ADDR)")
	}
	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM)
	defer stop()
	srv := &http.Server{Handler: metricsHandler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	fmt.Fprintf(c.App.ErrWriter, "ublkimg: serving metrics on http://%s/metrics\n", ln.Addr())
	sdNotify("READY=1\nSTATUS=serving metrics on " + ln.Addr().String())
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// metricsHandler serves /metrics for every device of the host.
func metricsHandler() http.Handler {
	return metricsHandlerFor(deviceCollector{source: queryAllDevices})
}

// metricsHandlerFor serves /metrics with the figures c collects.
func metricsHandlerFor(c prometheus.Collector) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	return mux
}

// scrapeTimeout bounds the wait for one server's figures.
const scrapeTimeout = 2 * time.Second

// deviceScrape is what one device contributes to a scrape: its figures,
// or the record of a device whose server did not answer.
type deviceScrape struct {
	rec   ublk.Record
	stats *ublk.DeviceStats
}

// queryAllDevices asks the server of every device with a record for its
// figures.
func queryAllDevices() []deviceScrape {
	ids, _ := ublk.RecordIDs()
	var out []deviceScrape
	for _, id := range ids {
		rec, err := ublk.ReadRecord(id)
		if err != nil {
			continue
		}
		d := deviceScrape{rec: rec}
		if rec.ServerAlive() {
			if c, err := ublk.DialControl(id); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
				if s, err := queryStats(ctx, c); err == nil {
					d.stats = &s
				}
				cancel()
				c.Close()
			}
		}
		out = append(out, d)
	}
	return out
}

var (
	deviceLabels = []string{"device", "image"}
	queueLabels  = []string{"device", "image", "queue"}
	opLabels     = []string{"device", "image", "queue", "op"}

	descUp = prometheus.NewDesc("ublkimg_device_up",
		"Whether the server of the device answered this scrape (1) or not (0).", deviceLabels, nil)
	descUptime = prometheus.NewDesc("ublkimg_server_uptime_seconds",
		"Time since the device's server started serving it.", deviceLabels, nil)
	descRequests = prometheus.NewDesc("ublkimg_requests_total",
		"Requests served since the server started, by queue and operation.", opLabels, nil)
	descBytes = prometheus.NewDesc("ublkimg_request_bytes_total",
		"Bytes moved (read, write) or covered (discard, write-zeroes) by successful requests.", opLabels, nil)
	descErrors = prometheus.NewDesc("ublkimg_request_errors_total",
		"Requests that failed.", opLabels, nil)
	descLatency = prometheus.NewDesc("ublkimg_request_duration_seconds",
		"Time from a request's arrival at the server to the completion of its last I/O.", opLabels, nil)
	descInFlight = prometheus.NewDesc("ublkimg_requests_in_flight",
		"Requests the queue is serving now.", queueLabels, nil)
)

// latencyBounds are the histogram's upper bounds exported, in nanoseconds:
// the powers of two from about 1 µs to 34 s, which are bounds of the
// server's own finer buckets, so the cumulative counts are exact.
var latencyBounds = func() []uint64 {
	var b []uint64
	for e := 10; e <= 35; e++ {
		b = append(b, 1<<e)
	}
	return b
}()

// deviceCollector is the Prometheus collector of every device's figures.
// It is unchecked (Describe sends nothing): the format counters a device
// has are known only once its server answered.
type deviceCollector struct {
	source func() []deviceScrape
}

func (deviceCollector) Describe(chan<- *prometheus.Desc) {}

func (dc deviceCollector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range dc.source() {
		dev := fmt.Sprintf("ublkb%d", d.rec.ID)
		image := d.rec.Image
		if d.stats == nil {
			ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 0, dev, image)
			continue
		}
		s := d.stats
		if s.Image != "" {
			image = s.Image
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 1, dev, image)
		ch <- prometheus.MustNewConstMetric(descUptime, prometheus.GaugeValue, float64(s.UptimeNs)/1e9, dev, image)
		for _, q := range s.Queues {
			queue := fmt.Sprint(q.Queue)
			ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(q.InFlight), dev, image, queue)
			for op := range ublk.NumStatOps {
				o := q.Op(op)
				labels := []string{dev, image, queue, op.String()}
				ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(o.Requests), labels...)
				ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(o.Bytes), labels...)
				ch <- prometheus.MustNewConstMetric(descErrors, prometheus.CounterValue, float64(o.Errors), labels...)
				ch <- prometheus.MustNewConstHistogram(descLatency, o.Requests, float64(o.LatencySumNs)/1e9,
					cumulativeBuckets(o), labels...)
			}
		}
		for _, c := range s.FormatCounters {
			desc := prometheus.NewDesc(fmt.Sprintf("ublkimg_%s_%s_total", metricName(s.Format), c.Name),
				fmt.Sprintf("The %s driver's %s counter.", s.Format, c.Name), deviceLabels, nil)
			ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(c.Value), dev, image)
		}
	}
}

// cumulativeBuckets returns o's latency histogram as Prometheus wants it:
// upper bound in seconds -> requests at most that long.
func cumulativeBuckets(o ublk.OpStats) map[float64]uint64 {
	out := make(map[float64]uint64, len(latencyBounds))
	var cum uint64
	i := 0
	for _, bound := range latencyBounds {
		for i < len(o.Latency) && o.Latency[i].UpperNs <= bound {
			cum += o.Latency[i].Count
			i++
		}
		out[float64(bound)/1e9] = cum
	}
	return out
}

// metricName makes s (a format name) fit a metric name: letters, digits
// and underscores.
func metricName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}
