package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"time"

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
	return metricsHandlerFor(queryAllDevices)
}

// metricsHandlerFor serves /metrics with the figures source gathers on
// every scrape.
func metricsHandlerFor(source func() []deviceScrape) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		scrapeMetrics(source()).WriteTo(w)
	})
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

// The metrics' names and help texts.
const (
	nameUp       = "ublkimg_device_up"
	helpUp       = "Whether the server of the device answered this scrape (1) or not (0)."
	nameUptime   = "ublkimg_server_uptime_seconds"
	helpUptime   = "Time since the device's server started serving it."
	nameRequests = "ublkimg_requests_total"
	helpRequests = "Requests served since the server started, by queue and operation."
	nameBytes    = "ublkimg_request_bytes_total"
	helpBytes    = "Bytes moved (read, write) or covered (discard, write-zeroes) by successful requests."
	nameErrors   = "ublkimg_request_errors_total"
	helpErrors   = "Requests that failed."
	nameLatency  = "ublkimg_request_duration_seconds"
	helpLatency  = "Time from a request's arrival at the server to the completion of its last I/O."
	nameInFlight = "ublkimg_requests_in_flight"
	helpInFlight = "Requests the queue is serving now."
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

// exposition builds a scrape in Prometheus' text format (version 0.0.4).
// It is written here rather than with client_golang, whose package
// initialisation (a default registry with Go and process collectors) every
// ublkimg process would pay for at start: attach runs two.
type exposition struct {
	families map[string]*family
}

// family is one metric's HELP and TYPE lines and its samples.
type family struct {
	help, typ string
	samples   strings.Builder
}

// family returns metric name's family, made on first use.
func (e *exposition) family(name, typ, help string) *family {
	if e.families == nil {
		e.families = map[string]*family{}
	}
	f := e.families[name]
	if f == nil {
		f = &family{help: help, typ: typ}
		e.families[name] = f
	}
	return f
}

// sample adds the sample name{labels} value to f (name is f's metric or,
// for a histogram, one of its _bucket, _sum and _count series). labels are
// name, value pairs, in the order client_golang writes them: by name, le
// last.
func (f *family) sample(name string, labels []string, value float64) {
	b := &f.samples
	b.WriteString(name)
	for i := 0; i+1 < len(labels); i += 2 {
		if i == 0 {
			b.WriteByte('{')
		} else {
			b.WriteByte(',')
		}
		b.WriteString(labels[i])
		b.WriteString(`="`)
		b.WriteString(labelEscaper.Replace(labels[i+1]))
		b.WriteByte('"')
	}
	if len(labels) > 0 {
		b.WriteByte('}')
	}
	b.WriteByte(' ')
	b.WriteString(formatFloat(value))
	b.WriteByte('\n')
}

// add adds a counter's or a gauge's sample.
func (e *exposition) add(name, typ, help string, value float64, labels ...string) {
	e.family(name, typ, help).sample(name, labels, value)
}

// histogram adds a histogram's samples: its cumulative buckets (upper
// bound in seconds, count; the +Inf bucket is count), sum and count.
func (e *exposition) histogram(name, help string, buckets []bucket, sum float64, count uint64, labels ...string) {
	f := e.family(name, "histogram", help)
	le := append(slices.Clip(labels), "le", "")
	for _, b := range buckets {
		le[len(le)-1] = formatFloat(b.le)
		f.sample(name+"_bucket", le, float64(b.count))
	}
	le[len(le)-1] = "+Inf"
	f.sample(name+"_bucket", le, float64(count))
	f.sample(name+"_sum", labels, sum)
	f.sample(name+"_count", labels, float64(count))
}

// WriteTo writes the families, sorted by name.
func (e *exposition) WriteTo(w io.Writer) (int64, error) {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(e.families)) {
		f := e.families[name]
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, helpEscaper.Replace(f.help), name, f.typ)
		b.WriteString(f.samples.String())
	}
	n, err := io.WriteString(w, b.String())
	return int64(n), err
}

var (
	labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
)

// formatFloat formats v as the text format wants it: Go's shortest
// representation, +Inf, -Inf, NaN.
func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// bucket is a histogram bucket: requests at most le seconds long.
type bucket struct {
	le    float64
	count uint64
}

// scrapeMetrics returns the exposition of the devices' figures.
func scrapeMetrics(devices []deviceScrape) *exposition {
	e := &exposition{}
	for _, d := range devices {
		dev := fmt.Sprintf("ublkb%d", d.rec.ID)
		image := d.rec.Image
		if d.stats == nil {
			e.add(nameUp, "gauge", helpUp, 0, "device", dev, "image", image)
			continue
		}
		s := d.stats
		if s.Image != "" {
			image = s.Image
		}
		e.add(nameUp, "gauge", helpUp, 1, "device", dev, "image", image)
		e.add(nameUptime, "gauge", helpUptime, float64(s.UptimeNs)/1e9, "device", dev, "image", image)
		for _, q := range s.Queues {
			queue := strconv.Itoa(q.Queue)
			e.add(nameInFlight, "gauge", helpInFlight, float64(q.InFlight), "device", dev, "image", image, "queue", queue)
			for op := range ublk.NumStatOps {
				o := q.Op(op)
				labels := []string{"device", dev, "image", image, "op", op.String(), "queue", queue}
				e.add(nameRequests, "counter", helpRequests, float64(o.Requests), labels...)
				e.add(nameBytes, "counter", helpBytes, float64(o.Bytes), labels...)
				e.add(nameErrors, "counter", helpErrors, float64(o.Errors), labels...)
				e.histogram(nameLatency, helpLatency, cumulativeBuckets(o), float64(o.LatencySumNs)/1e9, o.Requests, labels...)
			}
		}
		for _, c := range s.FormatCounters {
			e.add(fmt.Sprintf("ublkimg_%s_%s_total", metricName(s.Format), c.Name), "counter",
				fmt.Sprintf("The %s driver's %s counter.", s.Format, c.Name), float64(c.Value), "device", dev, "image", image)
		}
	}
	return e
}

// cumulativeBuckets returns o's latency histogram as Prometheus wants it:
// upper bound in seconds -> requests at most that long, by bound.
func cumulativeBuckets(o ublk.OpStats) []bucket {
	out := make([]bucket, 0, len(latencyBounds))
	var cum uint64
	i := 0
	for _, bound := range latencyBounds {
		for i < len(o.Latency) && o.Latency[i].UpperNs <= bound {
			cum += o.Latency[i].Count
			i++
		}
		out = append(out, bucket{le: float64(bound) / 1e9, count: cum})
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
